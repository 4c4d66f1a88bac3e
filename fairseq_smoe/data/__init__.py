"""Data: audio reading and bandwidth, config.yaml, manifests and the routed dataset/collater, vocabularies."""
