"""Local stack: a Ray head node (dashboard) and an MLflow tracking server. (in progress)"""


def add_commands(sub) -> None:
    pass
