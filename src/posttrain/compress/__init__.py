"""posttrain.compress"""
