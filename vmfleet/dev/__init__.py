"""The local environment: control plane, brokers and sshd "VMs" as background processes."""
