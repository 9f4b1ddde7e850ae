"""End-to-end pipelines, their configuration and the `clearair` command line."""
