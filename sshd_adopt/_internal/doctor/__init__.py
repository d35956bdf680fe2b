"""``sshd-adopt doctor``: :mod:`.checks` judges gathered facts, :mod:`.gather` gathers them."""
