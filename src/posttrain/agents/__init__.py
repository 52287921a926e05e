"""posttrain.agents"""
