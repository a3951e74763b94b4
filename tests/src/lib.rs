//! The cross-service test suite lives in `tests/tests/`: each file boots the real services in process
//! (port 0, real `redis-server`) through `chipgate-testkit` and talks gRPC to them, or drives them with
//! real external clients (grpcurl, Python grpcio).
