"""posttrain.select"""
