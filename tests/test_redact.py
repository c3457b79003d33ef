"""The one redaction policy (ferflow.redact): what of a URI or a message may be written."""

import logging

from ferflow.redact import RedactingFilter, is_redacted, redact_text, redact_tree, redact_uri


def test_userinfo_and_secret_query_values_are_masked_the_rest_kept():
    assert redact_uri("https://u:p@h.example:8443/x?token=abc&x=1") == "https://***@h.example:8443/x?token=***&x=1"
    presigned = ("https://bucket.s3.amazonaws.com/LFW.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                 "&X-Amz-Credential=AKIA%2F20261201&X-Amz-Date=20261201T000000Z&X-Amz-Expires=3600"
                 "&X-Amz-SignedHeaders=host&X-Amz-Security-Token=FQo&X-Amz-Signature=9f8e")
    assert redact_uri(presigned) == (
        "https://bucket.s3.amazonaws.com/LFW.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=***&X-Amz-Date=20261201T000000Z&X-Amz-Expires=3600"
        "&X-Amz-SignedHeaders=host&X-Amz-Security-Token=***&X-Amz-Signature=***")
    # Azure SAS, GCS signed URLs, CloudFront, plain api keys
    assert redact_uri("https://a.blob.core.windows.net/c/f.zip?sv=2022&sig=abc%2B") == \
        "https://a.blob.core.windows.net/c/f.zip?sv=2022&sig=***"
    assert redact_uri("https://storage.googleapis.com/b/f?X-Goog-Signature=1&X-Goog-Credential=2") == \
        "https://storage.googleapis.com/b/f?X-Goog-Signature=***&X-Goog-Credential=***"
    assert redact_uri("https://d.cloudfront.net/f?Policy=p&Signature=s&Key-Pair-Id=k") == \
        "https://d.cloudfront.net/f?Policy=***&Signature=***&Key-Pair-Id=***"
    assert redact_uri("https://h/f?api_key=k1&page=2#frag") == "https://h/f?api_key=***&page=2#frag"
    # nothing secret: unchanged
    for plain in ("sqlite:///mlruns/mlflow.db", "s3://bucket/key.zip?versionId=3", "/data/LFW-FER.zip",
                  "https://drive.google.com/file/d/1AbC/view?usp=sharing"):
        assert redact_uri(plain) == plain


def test_messages_env_values_and_trees(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-0a1b2c-distinct")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-3d4e5f-distinct")
    text = redact_text("failed: pw-0a1b2c-distinct / tok-3d4e5f-distinct at postgresql://a:b@db/x")
    assert text == "failed: *** / *** at postgresql://***@db/x"
    # urllib3's debug line has no scheme, only the request line with its query string
    line = 'http://127.0.0.1:8000 "GET /x.zip?token=t0k&X-Amz-Signature=s1g HTTP/1.1" 200 12'
    assert redact_text(line) == 'http://127.0.0.1:8000 "GET /x.zip?token=***&X-Amz-Signature=*** HTTP/1.1" 200 12'
    tree = {"data": {"archives": {"A": {"uri": "https://u:p@h/a.zip?sig=s", "size": 3}}}, "l": ["https://u:p@h"]}
    assert redact_tree(tree) == {"data": {"archives": {"A": {"uri": "https://***@h/a.zip?sig=***", "size": 3}}},
                                 "l": ["https://***@h"]}


def test_a_masked_uri_is_recognised():
    assert is_redacted(redact_uri("https://u:p@h/a.zip")) and is_redacted(redact_uri("https://h/a?token=1&b=2"))
    assert not is_redacted("https://h/a.zip?b=2")


def test_log_records_are_redacted_after_formatting_their_arguments():
    record = logging.LogRecord("urllib3", logging.DEBUG, __file__, 1, '%s "GET %s HTTP/1.1"', ("http://h:1", "/a?token=t"),
                               None)
    assert RedactingFilter().filter(record) is True
    assert record.getMessage() == 'http://h:1 "GET /a?token=*** HTTP/1.1"'
