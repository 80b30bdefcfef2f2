"""The scheduled jobs: partitions, archive (nightly + restore), reconcile. Plain functions."""
