"""ehrfm.finetune"""
