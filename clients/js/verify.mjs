// Verify an entitle license file (a compact JWS, EdDSA/Ed25519) with Node's
// built-in crypto: no dependencies. Node 18 or later.
//
//   import { verifyLicense } from "./verify.mjs";
//   const license = verifyLicense(token, publicKeyBase64, { fingerprint: thisDevice });
//   if (license.features.export) { ... }
//
// publicKeyBase64 is a key's `public_key` from GET /v1/keys (raw 32 bytes,
// base64). The signature is checked over the token's first two parts exactly
// as shipped; nothing is serialised again. Throws InvalidLicense whose `kind`
// is "malformed", "signature", "device" or "expired".
//
// Run as a program, it checks every case of a test vector file:
//   node clients/js/verify.mjs contracts/license_file_vectors.json

import { createPublicKey, verify } from "node:crypto";
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

export class InvalidLicense extends Error {
  constructor(kind, message) {
    super(message);
    this.name = "InvalidLicense";
    this.kind = kind;
  }
}

const malformed = () => new InvalidLicense("malformed", "not a well-formed license file");

function fromBase64url(text) {
  if (!/^[A-Za-z0-9_-]+$/.test(text) || text.length % 4 === 1) throw malformed();
  const bytes = Buffer.from(text, "base64url");
  // Canonical only: a last character with unused bits set decodes to the
  // same bytes, and would make another file that verifies.
  if (bytes.toString("base64url") !== text) throw malformed();
  return bytes;
}

function parseJson(bytes) {
  try {
    return JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch {
    throw malformed();
  }
}

export function verifyLicense(token, publicKeyBase64, { fingerprint = null, now = new Date() } = {}) {
  if (typeof publicKeyBase64 !== "string") {
    throw new InvalidLicense("malformed", "the public key is not a base64 string");
  }
  const parts = String(token).trim().split(".");
  if (parts.length !== 3) throw malformed();
  const header = parseJson(fromBase64url(parts[0]));
  if (header === null || typeof header !== "object" || header.alg !== "EdDSA") throw malformed();
  const raw = Buffer.from(publicKeyBase64, "base64");
  if (raw.length !== 32) throw new InvalidLicense("malformed", "the public key is not 32 bytes");
  const key = createPublicKey({
    key: { kty: "OKP", crv: "Ed25519", x: raw.toString("base64url") },
    format: "jwk",
  });
  const signed = Buffer.from(`${parts[0]}.${parts[1]}`, "ascii");
  if (!verify(null, signed, key, fromBase64url(parts[2]))) {
    throw new InvalidLicense("signature", "the signature does not match: the file was altered");
  }
  const license = parseJson(fromBase64url(parts[1]));
  if (license === null || typeof license !== "object" || license.format !== "entitle-license/1") {
    throw malformed();
  }
  if (fingerprint !== null && license.fingerprint !== fingerprint) {
    throw new InvalidLicense("device", "the license is for another device");
  }
  const expires = new Date(license.expires_at);
  if (Number.isNaN(expires.getTime())) throw malformed();
  if (!(now < expires)) throw new InvalidLicense("expired", "the license has expired");
  return license;
}

function sameJson(a, b) {
  return JSON.stringify(sorted(a)) === JSON.stringify(sorted(b));
}

function sorted(value) {
  if (Array.isArray(value)) return value.map(sorted);
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.keys(value).sort().map((k) => [k, sorted(value[k])]));
  }
  return value;
}

function checkVectors(path) {
  const vectors = JSON.parse(readFileSync(path, "utf8"));
  let failed = 0;
  for (const c of vectors.cases) {
    let got;
    try {
      const license = verifyLicense(c.token, vectors.public_key, {
        fingerprint: c.fingerprint,
        now: new Date(c.now),
      });
      got = { valid: true, license };
    } catch (error) {
      if (!(error instanceof InvalidLicense)) throw error;
      got = { valid: false, error: error.kind };
    }
    const ok = sameJson(got, c.expect);
    if (!ok) failed += 1;
    console.log(`${ok ? "ok  " : "FAIL"} ${c.name}${ok ? "" : `: got ${JSON.stringify(got)}`}`);
  }
  console.log(`${vectors.cases.length - failed} of ${vectors.cases.length} cases as expected`);
  return failed === 0;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  if (process.argv.length !== 3) {
    console.error("usage: node verify.mjs VECTORS.json");
    process.exit(2);
  }
  process.exit(checkVectors(process.argv[2]) ? 0 : 1);
}
