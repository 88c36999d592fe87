"""mlflow_project.sweep"""
