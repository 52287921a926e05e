"""posttrain.align"""
