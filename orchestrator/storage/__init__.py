"""Object storage: URIs to filesystems, the run layout, manifests, and the embedded S3 server."""
