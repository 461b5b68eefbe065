#!/usr/bin/env python3
"""Submits one exchange to token-broker and waits for it, as a backend would.

Plays the app too: makes a PKCE pair and gets a code from the fake upstream's side endpoint.
Needs stubs generated from the proto (see README, "Client examples"):

    python -m grpc_tools.protoc -I proto --python_out=GEN --grpc_python_out=GEN \
        proto/tokenbroker/v1/token_broker.proto
    PYTHONPATH=GEN python examples/python/exchange.py --broker 127.0.0.1:50051 \
        --fake http://127.0.0.1:8080

Exits 0 when the job succeeded. Prints the job, never the token.
"""
import argparse
import base64
import hashlib
import json
import secrets
import sys
import urllib.parse
import urllib.request

import grpc

from tokenbroker.v1 import token_broker_pb2 as pb
from tokenbroker.v1 import token_broker_pb2_grpc as rpc


def pkce_pair():
    verifier = secrets.token_urlsafe(64)
    digest = hashlib.sha256(verifier.encode()).digest()
    challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return verifier, challenge


def authorize(fake, client_id, challenge):
    form = urllib.parse.urlencode(
        {"client_id": client_id, "code_challenge": challenge, "code_challenge_method": "S256"}
    ).encode()
    with urllib.request.urlopen(f"{fake}/test/authorize", data=form, timeout=5) as response:
        return json.load(response)["code"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="127.0.0.1:50051")
    parser.add_argument("--fake", default="http://127.0.0.1:8080")
    parser.add_argument("--client-id", default="python-example")
    args = parser.parse_args()

    verifier, challenge = pkce_pair()
    code = authorize(args.fake, args.client_id, challenge)
    with grpc.insecure_channel(args.broker) as channel:
        broker = rpc.TokenBrokerStub(channel)
        request = pb.SubmitExchangeRequest(
            client_id=args.client_id, code=code, code_verifier=verifier, state="python-example"
        )
        # Exchange waits for the outcome, answering shortly before the deadline at the latest.
        job = broker.Exchange(request, timeout=30)
        # If the deadline came first, follow the job until it is terminal.
        if job.state not in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
            for job in broker.WatchJob(pb.GetJobRequest(job_id=job.job_id), timeout=300):
                pass
    state = pb.JobState.Name(job.state)
    print(f"job {job.job_id}: {state} after {job.attempts} attempt(s)")
    if job.state != pb.JOB_STATE_SUCCEEDED:
        print(f"failed: {pb.FailureReason.Name(job.failure_reason)} {job.failure_detail}")
        return 1
    print(f"token received ({job.token.token_type}, expires in {job.token.expires_in} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
