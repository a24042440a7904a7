import json

from contracts import SCHEMA_DIR, export_schemas
from contracts.license_file import license_vectors

for path in export_schemas():
    print(path)
vectors = SCHEMA_DIR.parent / "license_file_vectors.json"
vectors.write_text(json.dumps(license_vectors(), indent=2, ensure_ascii=False) + "\n")
print(vectors)
