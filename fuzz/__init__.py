"""Coverage-guided fuzz targets (atheris) for larder's parsers of untrusted input."""
