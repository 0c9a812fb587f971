#!/usr/bin/env python3
"""Serves fakepve (PyPI: an independent fake of the Proxmox VE API) for ssh-on-demand-api's tests.

Usage: fakepve_serve.py SPEC.json

SPEC: {"token_id": "user@pve!id", "token_secret": "...", "dir": "/tmp/x",
       "guests": [{"vmid": 100, "name": "dev", "type": "qemu"|"lxc", "status": "stopped",
                   "config": {...}, "agent": {"interfaces": [...]} | null,
                   "agent_after_start": seconds, "start_error": "...",
                   "lock": "suspended" (with status "stopped": a VM suspended to disk)}]}

Prints one JSON line when listening: {"url", "ca_file", "fingerprint"}; then one JSON line per power
action the fake receives ({"event": "start"|"shutdown"|"stop"|"suspend"|"hibernate"|"resume", "vmid": N};
"hibernate" is a suspend with todisk=1), so that a test can "boot" the guest's sshd when Proxmox starts it.
Exits when stdin closes.
"""
import asyncio
import hashlib
import json
import sys

from fakepve import FakePve
from fakepve.certs import make_cert


def emit(**fields):
    print(json.dumps(fields), flush=True)


async def main(spec):
    certfile, keyfile, der = make_cert(spec["dir"], hosts=("127.0.0.1",))
    pve = FakePve(host="127.0.0.1", port=0)
    pve.apitokens[spec["token_id"]] = spec["token_secret"]
    agents_later = {}
    for guest in spec["guests"]:
        if guest.get("type") == "lxc":
            pve.add_ct(guest["vmid"], guest["name"], status=guest.get("status", "stopped"),
                       config=guest.get("config", {}))
            continue
        vm = pve.add_vm(guest["vmid"], guest["name"], status=guest.get("status", "stopped"),
                        config=guest.get("config", {}))
        vm.agent = guest.get("agent")
        if "start_error" in guest:
            vm.start_error = guest["start_error"]
        if "lock" in guest:
            vm.lock = vm.config["lock"] = guest["lock"]
        if "agent_after_start" in guest:
            agents_later[vm.vmid] = (guest["agent_after_start"], vm.agent)
            vm.agent = None

    # Report power actions; a guest agent that comes up a while after the start, as in a booting guest.
    def watch(name, action):
        original = getattr(pve, name)

        async def hooked(*args, **kwargs):
            guest = args[0] if args and hasattr(args[0], "vmid") else None
            vmid = guest.vmid if guest else int(args[1]["vmid"])
            to_disk = action == "suspend" and guest and str(args[2].get("todisk", "0")) in ("1", "true")
            emit(event="hibernate" if to_disk else action, vmid=vmid)
            result = await original(*args, **kwargs)
            if action == "start" and vmid in agents_later:
                delay, agent = agents_later[vmid]
                target = pve.vm(vmid)
                asyncio.get_running_loop().call_later(delay, lambda: setattr(target, "agent", agent))
            return result
        setattr(pve, name, hooked)

    for name, action in (("_do_start", "start"), ("_do_shutdown", "shutdown"), ("_do_stop", "stop"),
                         ("_do_suspend", "suspend"), ("_do_resume", "resume"),
                         ("_lxc_start", "start"), ("_lxc_shutdown", "shutdown"), ("_lxc_stop", "stop")):
        watch(name, action)
    await pve.start(certfile, keyfile)
    emit(url=pve.url, ca_file=certfile, fingerprint=hashlib.sha256(der).hexdigest())
    # Until the test closes our stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await pve.stop()


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        asyncio.run(main(json.load(f)))
