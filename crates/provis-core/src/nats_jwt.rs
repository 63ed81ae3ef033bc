//! NATS JWTs (version 2 claims), the tokens nats-server and an auth callout
//! service exchange: `base64url(header).base64url(claims).base64url(sig)`,
//! signed with the nkey named in the claims' `iss`.
//!
//! Only what the auth callout needs: encoding claims with a key, and decoding
//! a token after checking its signature and expiry.

use serde_json::{Value, json};

use data_encoding::BASE64URL_NOPAD;

const HEADER_ALGORITHM: &str = "ed25519-nkey";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("not a JWT (three base64url parts separated by dots)")]
    Shape,
    #[error("the JWT header is not NATS's (typ JWT, alg {HEADER_ALGORITHM})")]
    Header,
    #[error("the JWT claims are not JSON: {0}")]
    Claims(String),
    #[error("the JWT issuer {0:?} is not a public nkey")]
    Issuer(String),
    #[error("the JWT signature does not verify against its issuer")]
    Signature,
    #[error("the JWT expired")]
    Expired,
    #[error("the issuer key cannot sign (it holds no seed)")]
    CannotSign,
}

/// Signs `claims` (an object; `iss`, `iat` and `jti` are filled in) with `issuer`.
pub fn encode(mut claims: Value, issuer: &nkeys::KeyPair) -> Result<String, JwtError> {
    let now = crate::envelope::now_unix_ms() / 1000;
    claims["iss"] = json!(issuer.public_key());
    claims["iat"] = json!(now);
    claims["jti"] = json!("");
    // The id is a digest of the claims, as NATS's own tools make it.
    let digest = ring::digest::digest(&ring::digest::SHA256, claims.to_string().as_bytes());
    claims["jti"] = json!(data_encoding::BASE32_NOPAD.encode(digest.as_ref()));
    let header = json!({ "typ": "JWT", "alg": HEADER_ALGORITHM });
    let signed = format!(
        "{}.{}",
        BASE64URL_NOPAD.encode(header.to_string().as_bytes()),
        BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
    );
    let signature = issuer
        .sign(signed.as_bytes())
        .map_err(|_| JwtError::CannotSign)?;
    Ok(format!("{signed}.{}", BASE64URL_NOPAD.encode(&signature)))
}

/// The claims of `token`, once its header, signature (by its own `iss`) and
/// expiry check out. Who the issuer must be is the caller's question.
pub fn decode(token: &str) -> Result<Value, JwtError> {
    let mut parts = token.trim().split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Shape);
    };
    let part = |text: &str| {
        BASE64URL_NOPAD
            .decode(text.trim_end_matches('=').as_bytes())
            .map_err(|_| JwtError::Shape)
    };
    let header_json: Value =
        serde_json::from_slice(&part(header)?).map_err(|_| JwtError::Header)?;
    if !header_json["typ"]
        .as_str()
        .is_some_and(|typ| typ.eq_ignore_ascii_case("jwt"))
        || header_json["alg"] != HEADER_ALGORITHM
    {
        return Err(JwtError::Header);
    }
    let claims_json: Value =
        serde_json::from_slice(&part(claims)?).map_err(|err| JwtError::Claims(err.to_string()))?;
    let issuer = claims_json["iss"].as_str().unwrap_or_default();
    let key =
        nkeys::KeyPair::from_public_key(issuer).map_err(|_| JwtError::Issuer(issuer.to_owned()))?;
    key.verify(format!("{header}.{claims}").as_bytes(), &part(signature)?)
        .map_err(|_| JwtError::Signature)?;
    if let Some(expires) = claims_json["exp"].as_i64()
        && expires != 0
        && expires < crate::envelope::now_unix_ms() / 1000
    {
        return Err(JwtError::Expired);
    }
    Ok(claims_json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_decodes_only_as_signed() {
        let account = nkeys::KeyPair::new_account();
        let token = encode(
            json!({ "sub": "U123", "nats": { "type": "user" } }),
            &account,
        )
        .unwrap();
        let claims = decode(&token).unwrap();
        assert_eq!(claims["iss"], account.public_key());
        assert_eq!(claims["sub"], "U123");
        assert!(claims["jti"].as_str().is_some_and(|jti| !jti.is_empty()));

        // Claims changed after signing.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = BASE64URL_NOPAD.encode(
            json!({ "sub": "U999", "iss": account.public_key() })
                .to_string()
                .as_bytes(),
        );
        parts[1] = &forged;
        assert_eq!(decode(&parts.join(".")), Err(JwtError::Signature));
        // Signed by another key claiming to be the issuer.
        let other = nkeys::KeyPair::new_account();
        let mut claims = json!({ "sub": "U1" });
        claims["iss"] = json!(account.public_key());
        let impostor = encode(claims, &other).unwrap();
        assert!(
            decode(&impostor).is_ok(),
            "iss is rewritten to the real signer"
        );
        assert_eq!(decode(&impostor).unwrap()["iss"], other.public_key());

        assert_eq!(decode("a.b"), Err(JwtError::Shape));
        let expired = encode(json!({ "exp": 1 }), &account).unwrap();
        assert_eq!(decode(&expired), Err(JwtError::Expired));
    }
}
