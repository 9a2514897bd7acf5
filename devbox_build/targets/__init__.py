"""Where images run: one module per target (EC2 boxes today; SageMaker registration lives in\nsagemaker.py until it moves here).\n"""
