{
  "targets": [
    {
      "target_name": "lz4",
      "sources": ["lz4.c"],
      "libraries": ["-llz4"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
