"""Uploads a file to confab with tuspy, a standard tus 1.0 client, and
prints the upload's URL. Run by tests/e2e/files.rs.

usage: tus_upload.py SERVER_URL TOKEN FILE CHUNK_BYTES
"""
import sys

from tusclient import client


def main():
    server, token, path, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tus = client.TusClient(server + "/v1/blobs", headers={"Authorization": "Bearer " + token})
    uploader = tus.uploader(path, chunk_size=chunk)
    uploader.upload()
    print(uploader.url)


if __name__ == "__main__":
    main()
