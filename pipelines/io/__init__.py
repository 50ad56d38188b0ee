"""Reading raw inputs wherever they live: filesystems (local, S3 with custom endpoints), the one reader of image
files, folder trees and archives (tar, ImageNet's tar of tars, .tar.gz, zip) and class labels."""
