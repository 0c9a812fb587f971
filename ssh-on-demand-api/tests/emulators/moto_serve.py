#!/usr/bin/env python3
"""Serves moto's EC2 server (PyPI: moto[server]) with signature checking on, for ssh-on-demand-api's tests.

Usage: moto_serve.py N [--hibernation=I,J,...] [IP...]
  IP: the instances' private addresses, all in one 127.A.B.0/24 (default: random);
  --hibernation: the instances (by index) launched with HibernationOptions Configured=true.

Makes a VPC and subnet in 127.0.0.0/8, so that every instance's private address is loopback, and N
stopped instances in it; an IAM user whose key may call EC2; then turns authentication on (moto's
INITIAL_NO_AUTH_ACTION_COUNT = 0: every request must be signed with a key moto knows). Prints one JSON
line: {"endpoint", "region", "access_key_id", "secret_access_key", "instances": [{"id", "ip"}]}, then one
line per power action ({"event": "start"|"stop"|"hibernate", "id": ...}; a hibernation is also a stop).
Exits when stdin closes.

moto takes StopInstances' Hibernate=true and stops the instance as usual; EC2 records a hibernation in the
instance's state reason (Client.UserInitiatedHibernate), which the companion reads to tell a hibernated
instance from a stopped one. This script does that part of EC2's behaviour; the rest is moto's.
"""
import json
import random
import sys

import boto3
import requests
from moto.ec2.models.instances import InstanceBackend, StateReason
from moto.ec2.responses.instances import InstanceResponse
from moto.server import ThreadedMotoServer

REGION = "eu-central-1"


def emit(**fields):
    print(json.dumps(fields), flush=True)


def watch(name, action):
    original = getattr(InstanceBackend, name)

    def hooked(self, instance_ids, *args, **kwargs):
        for instance_id in instance_ids:
            emit(event=action, id=instance_id)
        return original(self, instance_ids, *args, **kwargs)
    setattr(InstanceBackend, name, hooked)


def record_hibernations():
    original = InstanceResponse.stop_instances

    def stop_instances(self):
        result = original(self)
        if self._get_bool_param("Hibernate", False):
            for instance_id in self._get_param("InstanceIds", []):
                self.ec2_backend.get_instance(instance_id).state_reason = StateReason(
                    "Client.UserInitiatedHibernate: User initiated hibernate", "Client.UserInitiatedHibernate")
                emit(event="hibernate", id=instance_id)
        return result
    InstanceResponse.stop_instances = stop_instances


def main(count, hibernation, ips):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = "http://{0}:{1}".format(host, port)
    setup = dict(endpoint_url=url, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="setup")
    ec2 = boto3.client("ec2", **setup)
    # Loopback addresses only: a test never connects to an address that moto invents.
    net = ips[0].rsplit(".", 1)[0] if ips else "127.{0}.{1}".format(random.randint(100, 199), random.randint(1, 254))
    vpc = ec2.create_vpc(CidrBlock=net + ".0/24")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=net + ".0/24")["Subnet"]["SubnetId"]
    instances = []
    for n in range(count):
        ip = ips[n] if n < len(ips) else "{0}.{1}".format(net, 10 + n)
        run = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnet,
                                PrivateIpAddress=ip, HibernationOptions={"Configured": n in hibernation})
        instances.append({"id": run["Instances"][0]["InstanceId"], "ip": ip})
    ec2.stop_instances(InstanceIds=[i["id"] for i in instances])
    iam = boto3.client("iam", **setup)
    iam.create_user(UserName="ssh-on-demand-api")
    key = iam.create_access_key(UserName="ssh-on-demand-api")["AccessKey"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "ec2:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="ssh-on-demand-api", PolicyName="ec2", PolicyDocument=json.dumps(policy))
    requests.post(url + "/moto-api/reset-auth", data=b"0").raise_for_status()
    # Only the companion's power actions from here on.
    watch("start_instances", "start")
    watch("stop_instances", "stop")
    record_hibernations()
    emit(endpoint=url + "/", region=REGION, access_key_id=key["AccessKeyId"],
         secret_access_key=key["SecretAccessKey"], instances=instances)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    options = [a for a in sys.argv[2:] if a.startswith("--hibernation=")]
    hibernation = {int(i) for o in options for i in o.split("=", 1)[1].split(",") if i}
    main(int(sys.argv[1]), hibernation, [a for a in sys.argv[2:] if a not in options])
