from contracts import export_schemas

for path in export_schemas():
    print(path)
