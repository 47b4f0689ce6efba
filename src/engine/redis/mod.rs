//! The Redis engine (see the module docs of its parts).
