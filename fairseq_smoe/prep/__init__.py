"""Data preparation: corpus readers (public corpora in recipe.py's readers, the offline demo corpus in offline*.py),
all ending in the one data-directory writer, common.write_data_dir (manifests, vocabulary, config.yaml)."""
