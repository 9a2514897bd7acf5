"""Least-privilege IAM policies for EC2 boxes: what a person running `devbox-build ec2` needs,
and what the boxes' instance role needs. Every write is scoped to resources tagged with the
box's name (EC2 checks the tag on the request for what is created, and on the resource for what
is changed); only the Describe calls, which IAM cannot scope, name every resource.
"""

from __future__ import annotations

from .ec2 import AMI_PARAMETERS, ECR_REPOSITORY, Box
from .fleet import TAG_BOX

VERSION = "2012-10-17"


def _ec2(box: Box, kind: str) -> str:
    return f"arn:aws:ec2:{box.region}:*:{kind}/*"


def _repository(box: Box) -> str:
    match = ECR_REPOSITORY.fullmatch(box.image)
    assert match, "the preflight checks the image is in ECR"
    return f"arn:aws:ecr:{match['region']}:{match['account']}:repository/{match['name']}"


def user_policy(box: Box, kms_keys: tuple[str, ...] = ()) -> dict:
    tagged = {"StringEquals": {f"aws:ResourceTag/{TAG_BOX}": box.name}}
    requested = {"StringEquals": {f"aws:RequestTag/{TAG_BOX}": box.name}}
    statements = [
        {"Sid": "Read", "Effect": "Allow", "Resource": "*", "Action": [
            "ec2:DescribeInstances", "ec2:DescribeVolumes", "ec2:DescribeSnapshots",
            "ec2:DescribeInstanceTypeOfferings", "ec2:DescribeSpotInstanceRequests",
            "ec2:DescribeVpcs"]},
        # One statement: the tags on the request are in the context of every resource it makes
        # or uses, so the instance and its root volume are tagged with the box, or nothing runs.
        {"Sid": "Launch", "Effect": "Allow", "Action": "ec2:RunInstances", "Resource": [
            _ec2(box, "instance"), _ec2(box, "volume"), f"arn:aws:ec2:{box.region}::image/*",
            _ec2(box, "subnet"), _ec2(box, "network-interface"), _ec2(box, "security-group"),
            _ec2(box, "spot-instances-request")], "Condition": requested},
        {"Sid": "DataVolume", "Effect": "Allow", "Action": "ec2:CreateVolume",
         "Resource": _ec2(box, "volume"), "Condition": requested},
        {"Sid": "TagOnCreate", "Effect": "Allow", "Action": "ec2:CreateTags",
         "Resource": [_ec2(box, "instance"), _ec2(box, "volume"),
                      f"arn:aws:ec2:{box.region}::snapshot/*"],
         "Condition": {"StringEquals": {"ec2:CreateAction": [
             "RunInstances", "CreateVolume", "CreateSnapshot"]}}},
        {"Sid": "Operate", "Effect": "Allow", "Condition": tagged, "Action": [
            "ec2:StartInstances", "ec2:StopInstances", "ec2:TerminateInstances",
            "ec2:ModifyInstanceAttribute", "ec2:DescribeInstanceAttribute",
            "ec2:GetConsoleOutput", "ec2:AttachVolume", "ec2:DetachVolume", "ec2:DeleteVolume",
            "ec2:CreateTags", "ec2:CancelSpotInstanceRequests"],
         "Resource": [_ec2(box, "instance"), _ec2(box, "volume"),
                      _ec2(box, "spot-instances-request")]},
        # A snapshot of the box's own volume (its tag), itself tagged with the box.
        {"Sid": "Snapshot", "Effect": "Allow", "Action": "ec2:CreateSnapshot",
         "Resource": [_ec2(box, "volume"), f"arn:aws:ec2:{box.region}::snapshot/*"],
         "Condition": {"StringEqualsIfExists": {f"aws:ResourceTag/{TAG_BOX}": box.name},
                       **requested}},
        {"Sid": "AmiParameters", "Effect": "Allow", "Action": "ssm:GetParameter",
         "Resource": sorted({f"arn:aws:ssm:{box.region}:*:parameter"
                             f"{name.split('{', 1)[0]}*" for name in AMI_PARAMETERS.values()})},
        {"Sid": "Lock", "Effect": "Allow", "Action": [
            "ssm:PutParameter", "ssm:GetParameter", "ssm:DeleteParameter"],
         "Resource": f"arn:aws:ssm:{box.region}:*:parameter/devbox/{box.name}/*"},
        # ssh through Session Manager, to the box's own instances only.
        {"Sid": "Login", "Effect": "Allow", "Action": "ssm:StartSession", "Resource": [
            _ec2(box, "instance"), f"arn:aws:ssm:{box.region}::document/AWS-StartSSHSession"],
         "Condition": {"StringEqualsIfExists": {f"ssm:resourceTag/{TAG_BOX}": box.name}}},
        {"Sid": "OwnSessions", "Effect": "Allow", "Action": [
            "ssm:TerminateSession", "ssm:ResumeSession"],
         "Resource": "arn:aws:ssm:*:*:session/${aws:userid}-*"},
        {"Sid": "ImageExists", "Effect": "Allow", "Action": "ecr:DescribeImages",
         "Resource": _repository(box)},
    ]
    if box.signed_by is not None:  # the image's signature is read before a box is launched
        statements += [
            {"Sid": "EcrLogin", "Effect": "Allow", "Action": "ecr:GetAuthorizationToken",
             "Resource": "*"},
            {"Sid": "ReadSignatures", "Effect": "Allow", "Resource": _repository(box),
             "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"]}]
    if box.instance_profile:
        statements.append({
            "Sid": "PassBoxRole", "Effect": "Allow", "Action": "iam:PassRole",
            "Resource": f"arn:aws:iam::*:role/{box.instance_profile}",
            "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}})
    if kms_keys:
        statements += _kms(kms_keys, grants=True)
    return {"Version": VERSION, "Statement": statements}


def box_policy(box: Box, buckets: tuple[str, ...] = (),
               kms_keys: tuple[str, ...] = ()) -> dict:
    statements = [
        # What AmazonSSMManagedInstanceCore grants: the agent's channels (Session Manager).
        {"Sid": "SessionManager", "Effect": "Allow", "Resource": "*", "Action": [
            "ssm:UpdateInstanceInformation", "ssmmessages:CreateControlChannel",
            "ssmmessages:CreateDataChannel", "ssmmessages:OpenControlChannel",
            "ssmmessages:OpenDataChannel", "ec2messages:AcknowledgeMessage",
            "ec2messages:DeleteMessage", "ec2messages:FailMessage", "ec2messages:GetEndpoint",
            "ec2messages:GetMessages", "ec2messages:SendReply"]},
        {"Sid": "EcrLogin", "Effect": "Allow", "Action": "ecr:GetAuthorizationToken",
         "Resource": "*"},
        {"Sid": "EcrPull", "Effect": "Allow", "Resource": _repository(box), "Action": [
            "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer",
            "ecr:BatchCheckLayerAvailability"]},
    ]
    if buckets:
        statements += [
            {"Sid": "DataList", "Effect": "Allow", "Action": "s3:ListBucket",
             "Resource": [f"arn:aws:s3:::{bucket}" for bucket in buckets]},
            {"Sid": "DataObjects", "Effect": "Allow", "Action": [
                "s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
             "Resource": [f"arn:aws:s3:::{bucket}/*" for bucket in buckets]}]
    if kms_keys:
        statements += _kms(kms_keys, grants=False)
    return {"Version": VERSION, "Statement": statements}


def _kms(keys: tuple[str, ...], grants: bool) -> list[dict]:
    statements = [{"Sid": "VolumeKey", "Effect": "Allow", "Resource": list(keys), "Action": [
        "kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKeyWithoutPlaintext",
        "kms:ReEncryptFrom", "kms:ReEncryptTo"]}]
    if grants:  # EBS asks for a grant when it attaches an encrypted volume
        statements.append({"Sid": "VolumeKeyGrant", "Effect": "Allow", "Resource": list(keys),
                           "Action": "kms:CreateGrant", "Condition": {
                               "Bool": {"kms:GrantIsForAWSResource": "true"}}})
    return statements
