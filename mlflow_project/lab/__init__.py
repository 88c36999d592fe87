"""mlflow_project.lab"""
