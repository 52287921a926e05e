"""posttrain.live"""
