"""ehrfm.launch"""
