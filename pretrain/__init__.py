"""ehrfm.pretrain"""
