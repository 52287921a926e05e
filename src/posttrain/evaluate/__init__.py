"""posttrain.evaluate"""
