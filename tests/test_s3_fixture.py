def test_s3_server_roundtrip(s3_env):
    client = s3_env.client()
    s3_env.make_bucket("roundtrip")
    client.put_object(Bucket="roundtrip", Key="a/b.txt", Body=b"hello")
    assert client.get_object(Bucket="roundtrip", Key="a/b.txt")["Body"].read() == b"hello"
