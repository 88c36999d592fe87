"""mlflow_project.lifecycle"""
