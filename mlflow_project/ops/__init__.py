"""mlflow_project.ops"""
