"""posttrain.tasks"""
