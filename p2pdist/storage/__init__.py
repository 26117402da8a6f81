"""The piece store on disk and the cache quota that bounds it."""
