#!/usr/bin/env python3
"""moto_server with one fix, for tests that turn moto's authentication on.

Usage: INITIAL_NO_AUTH_ACTION_COUNT=N python3 scripts/moto_auth_server.py -H 127.0.0.1 -p PORT

With INITIAL_NO_AUTH_ACTION_COUNT set, moto checks every request's SigV4
signature (after the first N requests) against its IAM users' keys and
enforces their IAM policies. moto 5.2 recomputes the signature from a query
string in which percent-encoded characters have been decoded, so any signed
request whose query holds an encoded '/' (every S3 listing below a folder:
`prefix=a%2Fb%2F`, from boto3 as from Rust's object_store) is refused with
SignatureDoesNotMatch. AWS signs the query encoded (RFC 3986, '/' as %2F);
this wrapper makes moto's recomputation encode it that way too, whatever
encoding the request arrived in. Nothing else changes.
"""

import sys
from urllib.parse import quote, unquote

import botocore.auth


def canonical_query_string(self, parts):
    if not parts.query:
        return ""
    pairs = []
    for pair in parts.query.split("&"):
        key, _, value = pair.partition("=")
        pairs.append((quote(unquote(key), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{key}={value}" for key, value in sorted(pairs))


botocore.auth.SigV4Auth._canonical_query_string_url = canonical_query_string

from moto.server import main  # noqa: E402  (after the patch)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
