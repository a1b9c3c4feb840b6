"""vmfleet: run commands and file transfers on plain VMs over SSH, driven from Kubernetes."""

__version__ = "0.1.0"
