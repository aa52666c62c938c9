"""Side-by-side benchmark of ossimport against rclone, awscli and s3cmd (see bench/README.md)."""
