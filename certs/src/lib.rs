//! `weft-certs`: the mesh's certificate authority and workload identity.
//! Nothing is implemented here yet.
