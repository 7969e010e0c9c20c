"""Secrets never persist: which key names are credentials, redaction, the options digest, scrubbing."""

from __future__ import annotations

import json

import pytest

from pipeline.redact import (
    REDACTED,
    fingerprint_view,
    is_secret_key,
    options_digest,
    redact,
    scrub,
    secret_values,
)

SECRET_NAMES = [
    "key",
    "secret",
    "token",
    "password",
    "passwd",
    "credentials",
    "credential",
    "auth",
    "api_key",
    "apiKey",
    "access_key",
    "aws_access_key_id",
    "aws_secret_access_key",
    "secret_key",
    "session_token",
    "aws_session_token",
    "private_key",
    "client_secret",
    "hf_token",
    "refresh_token",
    "account_key",
    "sas_token",
    "Authorization",
    "db-password",
    "basic.auth",
]
TASK_NAMES = [
    "max_new_tokens",
    "max_batch_tokens",
    "max_tokens",
    "label_all_tokens",
    "tokenizer",
    "return_token_type_ids",
    "pad_token",
    "eos_token",
    "keep_columns",
    "monkey",
    "id_column",
    "sort_key",
    "keyword",
    "top_k",
    "endpoint_url",
    "region",
    "uri",
    "storage_class",
]


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_credential_names_are_secret(name):
    assert is_secret_key(name)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_parameters_are_not_secret(name):
    assert not is_secret_key(name)


def test_redact_masks_storage_options_and_secret_keys_deeply_and_leaves_the_rest():
    spec = {
        "input": {
            "uri": "s3://bucket/in",
            "storage_options": {"key": "AKIA1", "secret": "S3CR3T", "endpoint_url": "http://h"},
        },
        "stages": [
            {
                "params": {
                    "max_new_tokens": 8,
                    "storage_options": {"token": "T0K3N"},
                    "client_kwargs": {"aws_secret_access_key": "S3CR3T"},
                }
            }
        ],
        "train": {"options": {"hf_token": "HFTOKEN", "label_all_tokens": True}},
        "source": "https://alice:hunter22@example.com/data.parquet",
    }
    out = redact(spec)
    text = json.dumps(out)
    for value in ("AKIA1", "S3CR3T", "T0K3N", "HFTOKEN", "hunter22"):
        assert value not in text
    assert out["input"]["storage_options"] == REDACTED
    assert out["input"]["uri"] == "s3://bucket/in"
    assert out["stages"][0]["params"]["max_new_tokens"] == 8
    assert out["stages"][0]["params"]["client_kwargs"] == {"aws_secret_access_key": REDACTED}
    assert out["train"]["options"] == {"hf_token": REDACTED, "label_all_tokens": True}
    assert out["source"] == f"https://alice:{REDACTED}@example.com/data.parquet"
    # a copy: the caller's data is untouched
    assert spec["input"]["storage_options"]["secret"] == "S3CR3T"


def test_empty_storage_options_stay_visible():
    assert redact({"storage_options": {}}) == {"storage_options": {}}


def test_options_digest_follows_endpoint_not_credentials():
    base = {"endpoint_url": "http://a:9000", "region": "eu-west-1", "key": "K1", "secret": "S1"}
    rotated = {**base, "key": "K2", "secret": "S2"}
    elsewhere = {**base, "endpoint_url": "http://b:9000"}
    assert options_digest(base) == options_digest(rotated)
    assert options_digest(base) != options_digest(elsewhere)
    assert len(options_digest(None)) == 64 and options_digest(None) == options_digest({})


def test_fingerprint_view_holds_digests_and_no_secret():
    view = fingerprint_view(
        {"uri": "s3://b/x", "storage_options": {"secret": "S3CR3T", "endpoint_url": "http://h"}, "token": "T"}
    )
    assert view == {"uri": "s3://b/x", "storage_options": options_digest({"endpoint_url": "http://h"})}
    assert "S3CR3T" not in json.dumps(view)


def test_scrub_removes_secret_values_from_messages():
    opts = {"key": "AKIAEXAMPLE", "secret": "S3CR3T-abc", "endpoint_url": "http://127.0.0.1:5000"}
    message = "403 for key AKIAEXAMPLE signed with S3CR3T-abc at http://127.0.0.1:5000"
    cleaned = scrub(message, secret_values({"storage_options": opts}))
    assert "AKIAEXAMPLE" not in cleaned and "S3CR3T-abc" not in cleaned
    assert "http://127.0.0.1:5000" in cleaned and REDACTED in cleaned
