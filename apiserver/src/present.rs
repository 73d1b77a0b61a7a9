//! How the lab API server answers: JSON bodies, objects in the version
//! asked for, and errors as Kubernetes `Status` objects.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::resources::ResourceInfo;
use super::status::ApiError;
use super::store::Object;

pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

pub fn json_response(code: u16, value: &Value) -> Response<Body> {
    bytes_response(
        code,
        Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
    )
}

pub fn bytes_response(code: u16, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body).boxed_unsync());
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    response
}

pub fn error_response(err: &ApiError) -> Response<Body> {
    json_response(err.code, &err.to_status())
}

/// An object as stored, or rewritten to the requested version of a custom
/// resource served in several.
pub fn presented_json(object: &Object, info: &ResourceInfo, version: &str) -> Bytes {
    let api_version = info.api_version(version);
    if *object.api_version == *api_version {
        object.json.clone()
    } else {
        let mut value = object.value();
        value["apiVersion"] = json!(api_version);
        Bytes::from(serde_json::to_vec(&value).unwrap_or_default())
    }
}

pub fn object_response(
    code: u16,
    object: &Object,
    info: &ResourceInfo,
    version: &str,
) -> Response<Body> {
    bytes_response(code, presented_json(object, info, version))
}
