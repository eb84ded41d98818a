"""ehrfm.data_shards"""
