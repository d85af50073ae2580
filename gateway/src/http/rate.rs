//! Stub: filled in by issue 16's work package (see /work/notes/http-api.md).
