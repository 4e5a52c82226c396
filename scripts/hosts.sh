#!/usr/bin/env bash
# What the tests of other machines' engines need (tests/netns.py, tests/engines.py): network
# namespaces (iproute2, nsenter), iptables inside them, and Debian's sshd; installed when absent.
set -euo pipefail

pkgs=()
command -v ip >/dev/null || pkgs+=(iproute2)
command -v nsenter >/dev/null || pkgs+=(util-linux)
command -v iptables >/dev/null || pkgs+=(iptables)
command -v ssh-keygen >/dev/null || pkgs+=(openssh-client)
[ -x /usr/sbin/sshd ] || pkgs+=(openssh-server)
if [ ${#pkgs[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
    echo "hosts: installed ${pkgs[*]}"
else
    echo "hosts: iproute2, nsenter, iptables and sshd present"
fi
