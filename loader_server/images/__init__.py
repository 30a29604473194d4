"""Image files as fields: listing, decoding, resampling and the packed random-access format."""
