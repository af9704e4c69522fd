"""Test harness: real components (docker-registry, images, proxies) started by the tests."""
