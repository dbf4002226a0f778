//! The TLS certificate key in the HSM: an ECDSA P-256 key pair generated (or
//! imported once) as a non-extractable token object. Every handshake
//! signature and every CSR signature is `C_Sign(CKM_ECDSA)` over a SHA-256
//! digest computed here; the private key never exists outside the token.

use super::*;

pub const TLS_LABEL: &str = "tokenvault-tls";
const TLS_ID: &[u8] = b"tls-1";
/// DER of the P-256 curve OID (1.2.840.10045.3.1.7), as CKA_EC_PARAMS.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// SubjectPublicKeyInfo prefix for an uncompressed P-256 point (65 bytes follow).
pub const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

fn tls_template(class: ObjectClass) -> Vec<Attribute> {
    vec![
        Attribute::Class(class),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(true),
        Attribute::Label(TLS_LABEL.as_bytes().to_vec()),
        Attribute::Id(TLS_ID.to_vec()),
    ]
}

fn private_attrs() -> Vec<Attribute> {
    vec![
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Derive(false),
        Attribute::Unwrap(false),
    ]
}

fn public_attrs() -> Vec<Attribute> {
    vec![
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::EcParams(P256_PARAMS.to_vec()),
    ]
}

/// CKA_EC_POINT is a DER OCTET STRING around the uncompressed point.
fn point_from_attr(v: &[u8]) -> Option<Vec<u8>> {
    match v {
        [0x04, 0x41, rest @ ..] if rest.len() == 65 && rest[0] == 0x04 => Some(rest.to_vec()),
        [0x04, ..] if v.len() == 65 => Some(v.to_vec()),
        _ => None,
    }
}

/// `r ‖ s` (32 bytes each) as a DER `ECDSA-Sig-Value`.
pub fn ecdsa_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() != 64 {
        return None;
    }
    fn int(x: &[u8]) -> Vec<u8> {
        let mut x = x;
        while x.len() > 1 && x[0] == 0 {
            x = &x[1..];
        }
        let mut out = vec![0x02];
        if x[0] & 0x80 != 0 {
            out.push(x.len() as u8 + 1);
            out.push(0);
        } else {
            out.push(x.len() as u8);
        }
        out.extend_from_slice(x);
        out
    }
    let (r, s) = raw.split_at(32);
    let body = [int(r), int(s)].concat();
    let mut out = vec![0x30, body.len() as u8];
    out.extend(body);
    Some(out)
}

impl Pkcs11Backend {
    /// Whether the TLS key pair exists in the token.
    pub fn tls_key_present(&self) -> Result<bool, KeyError> {
        self.with_session(|p| {
            Ok(find_one(&p.session, &tls_template(ObjectClass::PRIVATE_KEY))?.is_some())
        })
    }

    /// Generates the P-256 key pair in the token unless one exists. Returns
    /// whether it created one (an existing key is never replaced).
    pub fn generate_tls_key(&self) -> Result<bool, SetupError> {
        let s = self.open_session().map_err(call("C_OpenSession/C_Login"))?;
        if find_one(&s.session, &tls_template(ObjectClass::PRIVATE_KEY))
            .map_err(call("C_FindObjects"))?
            .is_some()
        {
            return Ok(false);
        }
        let mut public = tls_template(ObjectClass::PUBLIC_KEY);
        public.extend(public_attrs());
        let mut private = tls_template(ObjectClass::PRIVATE_KEY);
        private.extend(private_attrs());
        s.session
            .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
            .map_err(call("C_GenerateKeyPair"))?;
        Ok(true)
    }

    /// Imports a P-256 private key (its scalar and public point) as the TLS
    /// key pair. Refuses if one exists. The caller shreds the source file.
    pub fn import_tls_key(&self, scalar: &[u8], point: &[u8]) -> Result<(), SetupError> {
        if scalar.len() != 32 || point.len() != 65 || point[0] != 0x04 {
            return Err(SetupError::Call("import", "not a P-256 key".into()));
        }
        let s = self.open_session().map_err(call("C_OpenSession/C_Login"))?;
        if find_one(&s.session, &tls_template(ObjectClass::PRIVATE_KEY))
            .map_err(call("C_FindObjects"))?
            .is_some()
        {
            return Err(SetupError::Call(
                "import",
                "the token already holds a TLS key (tokenvault-tls); it is never replaced".into(),
            ));
        }
        let mut public = tls_template(ObjectClass::PUBLIC_KEY);
        public.extend(public_attrs());
        let mut der_point = vec![0x04, 0x41];
        der_point.extend_from_slice(point);
        public.push(Attribute::EcPoint(der_point));
        s.session
            .create_object(&public)
            .map_err(call("C_CreateObject (public)"))?;
        let mut private = tls_template(ObjectClass::PRIVATE_KEY);
        private.extend(private_attrs());
        private.push(Attribute::EcParams(P256_PARAMS.to_vec()));
        private.push(Attribute::Value(scalar.to_vec()));
        let r = s.session.create_object(&private);
        for a in private.iter_mut() {
            if let Attribute::Value(v) = a {
                v.zeroize();
            }
        }
        r.map_err(call("C_CreateObject (private)"))?;
        Ok(())
    }

    /// The uncompressed public point (65 bytes).
    pub fn tls_public_point(&self) -> Result<Vec<u8>, KeyError> {
        let v = self.with_session(|p| {
            let h = find_one(&p.session, &tls_template(ObjectClass::PUBLIC_KEY))?
                .ok_or(CkError::InvalidValue)?;
            let attrs = p
                .session
                .get_attributes(h, &[cryptoki::object::AttributeType::EcPoint])?;
            Ok(attrs.into_iter().find_map(|a| match a {
                Attribute::EcPoint(v) => Some(v),
                _ => None,
            }))
        })?;
        v.as_deref()
            .and_then(point_from_attr)
            .ok_or(KeyError::InvalidInput)
    }

    /// ECDSA over a SHA-256 digest, in the token: raw `r ‖ s`.
    pub fn tls_sign_digest(&self, digest: &[u8; 32]) -> Result<Vec<u8>, KeyError> {
        self.with_session(|p| {
            let cached = self.tls_handle.lock().ok().and_then(|g| *g);
            let h = match cached {
                Some(h) => h,
                None => {
                    let h = find_one(&p.session, &tls_template(ObjectClass::PRIVATE_KEY))?
                        .ok_or(CkError::InvalidValue)?;
                    if let Ok(mut g) = self.tls_handle.lock() {
                        *g = Some(h);
                    }
                    h
                }
            };
            p.session.sign(&Mechanism::Ecdsa, h, digest)
        })
    }

    /// (sensitive, extractable) of the TLS private key (tests and `doctor`).
    pub fn tls_key_attributes(&self) -> Result<(bool, bool), KeyError> {
        self.with_session(|p| {
            let h = find_one(&p.session, &tls_template(ObjectClass::PRIVATE_KEY))?
                .ok_or(CkError::InvalidValue)?;
            let attrs = p.session.get_attributes(
                h,
                &[
                    cryptoki::object::AttributeType::Sensitive,
                    cryptoki::object::AttributeType::Extractable,
                ],
            )?;
            let mut r = (false, true);
            for a in attrs {
                match a {
                    Attribute::Sensitive(v) => r.0 = v,
                    Attribute::Extractable(v) => r.1 = v,
                    _ => {}
                }
            }
            Ok(r)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ecdsa_der_is_minimal() {
        let mut raw = [0u8; 64];
        raw[31] = 1; // r = 1
        raw[32] = 0x80; // s has its high bit set
        let der = ecdsa_der(&raw).unwrap();
        assert_eq!(&der[..5], &[0x30, 3 + 35, 0x02, 0x01, 0x01]);
        assert_eq!(&der[5..8], &[0x02, 0x21, 0x00]);
        assert_eq!(der.len(), 2 + 3 + 35);
        assert!(ecdsa_der(&raw[..63]).is_none());
    }
}
