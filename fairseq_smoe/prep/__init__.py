"""Data preparation: manifests, vocabularies and NB copies for public corpora and the offline demo corpus."""
