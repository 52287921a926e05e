"""posttrain.bus"""
